"""The public HTTP side: the request contract, CHAIN encoding and the ASGI app. Never imports torch."""

__version__ = "0.1.0"
SERVICE_NAME = "infernet-torch-service"
