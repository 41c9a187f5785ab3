"""The SOCKS commands, one module each: ``connect``, ``bind``, ``udp`` (UDP ASSOCIATE); what a
command is given (``base.CommandSession``) and how failures become reply codes (``replycodes``).
Each command opens what it needs, writes its own reply and hands the connection to the data
plane."""
