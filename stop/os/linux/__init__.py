"""The Linux backends of the OS layer: sock_diag (:mod:`.sockdiag`, the one
netlink transport), the ``netlink`` and ``procfs`` socket lookups
(:mod:`.lookup`, :mod:`.procnet`) and the ``procfs`` process inspector
(:mod:`.procfs`, :mod:`.fdindex`)."""
