"""The training job: data → preprocessing folded into a torch model → ONNX + model card.

Entry points: `trainer.fit.train_and_evaluate`, `trainer.fit.export_model` and the `modeltrain` CLI.
"""
