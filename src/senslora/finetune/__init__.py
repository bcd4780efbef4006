"""The fine-tuning harness: methods, tasks, training runs, grids and the demo.

It knows methods, not metrics: every method is one object in `senslora.finetune.methods`, and
the allocation library (`senslora`) is reached only through `senslora.pipeline`.
"""
