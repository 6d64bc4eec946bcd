"""The training job: data → preprocessing folded into a torch model → ONNX + model card.

Entry points: `trainer.fit.train_and_evaluate`, `trainer.export.export_model` and the `modeltrain` CLI.
"""
