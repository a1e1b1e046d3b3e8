"""What a run leaves on disk and how it is read back, without the trainer: checkpoints
(checkpoint.py), a trained model with its sampler (:class:`~meanflow.runs.run.TrainedRun`,
run.py), exported models (pretrained.py), reading either back (load.py), sample files
(sample_files.py), the authors' checkpoints (authors.py) and the diffusers pipeline
(pipeline.py, optional diffusers).

Layer: imports ``meanflow.config`` and everything below it (data, objectives, flow, nn,
runtime, errors); never ``meanflow.train``, ``meanflow.eval`` or ``meanflow.cli``.
"""
