"""The server process: start-up and the one derivation of its state from the config (``context``),
listeners and accept (``listener``), worker processes (``workers``), signals and reload
(``run``, ``reload``), this host's addresses (``hostaddrs``)."""
