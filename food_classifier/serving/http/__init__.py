"""The HTTP transport: the FastAPI app (thin routers), the Open Inference Protocol's REST routes, feedback, the
ASGI middleware, request decoding, the wire schemas and the web page. Never imported by another transport."""
