"""Authentication methods: one module per method, one small interface.

A method is chosen by ``socksd.server`` from the client's offer in the configured preference order;
then its sub-negotiation runs on the sans-I/O connection. ``none`` needs nothing; ``userpass``
checks RFC 1929 credentials against a user store (``stores``): an htpasswd file (``htpasswd``,
``userpass``), PAM (``pam``) or an LDAP directory (``ldap``, ``ldapconfig``); ``gssapi`` is the GSS-API
(Kerberos) glue of RFC 1961, whose protocol part is ``socksd.protocol.gssapi``.
"""
