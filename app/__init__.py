"""modelserve: serve ONNX models with onnxruntime over HTTP (dynamic batching, `/predict`, V2, metrics).

Nothing is built at import time: `app.main.create_app(settings)` assembles the service.
"""

__version__ = "0.1.0"
