"""Build-time converters (Keras, MXNet/Gluon to ONNX).

The scripts here run in their own virtual environments, started by
`machaon models build`; nothing in this package is imported by the service.
"""
