"""E2B's protocol as a front door of ``agent-vm serve`` (``--e2b-port``): the control
plane (``control.py``, ``snapshots.py``) and every sandbox's envd (``envd.py``,
``process.py``, ``filesystem.py``), translated into the service's calls (``door.py``
resolves and checks each envd request, ``errors.py`` speaks E2B's errors)."""
