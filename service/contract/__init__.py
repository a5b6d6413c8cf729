"""The contract shared by trainer and server (torch-free): classes, feature spec, anchors, model card.

Everything here travels with the exported model in its ONNX metadata, so a server can refuse a
model whose contract it cannot honour.
"""
