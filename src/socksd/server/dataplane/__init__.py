"""Moving the bytes once a command succeeded: the relay (``relay``: copy, half-close,
backpressure, idle timeout), its GSSAPI encapsulation (``gssapi``), bandwidth limits
(``bandwidth``), and the one factory that picks a session's relay and its terms (``terms``)."""
