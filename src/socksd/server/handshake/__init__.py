"""One client connection until its command runs: the session (greeting, method, sub-negotiation,
request; ``session``), GSSAPI context establishment (``gssapi``), and the admission checkpoints
that decide what the session may do (``admission``)."""
