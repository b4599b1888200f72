"""The offline tokenization job: images -> ten crops -> VQ codes -> a Zarr token store.

Entry points: ``tokenize_data.job.main(argv)`` (``star-scale tokenize``),
``tokenize_data.job.run(...)`` and ``tokenize_data.job.verify(path)``.
This package imports ``star_scale``; ``star_scale`` never imports it.
"""
