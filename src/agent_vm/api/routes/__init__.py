"""The native API's routes, one module per resource; each is a thin translation onto
the service (``api/service.py``)."""
