from setuptools import find_packages, setup

setup(
    name="star-scale",
    version="0.1.0",
    description="Train ST-AR autoregressive image generators (LlamaGen GPT + self-guided losses) at cluster scale",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["star_scale", "star_scale.*", "tokenize_data", "tokenize_data.*"]),
    install_requires=[
        "torch>=2.5",  # torch.serialization.safe_globals, get_unsafe_globals_in_checkpoint
        # The tested minor versions only: star_scale/parallel/ relies on their internals
        # (ZeRO-3 partitions and fp32 shards, megatron's parallel state); parallel/versions.py
        # checks the same bounds and every name used at start-up.
        "deepspeed>=0.19,<0.20",  # install with DS_BUILD_OPS=0 on CPU (the Makefile does)
        "megatron-core>=0.16,<0.17",
        "mlflow>=2.16",
        "zarr>=3",
        "pyyaml",
        "numpy",
        "scipy",
        "matplotlib",
        "tqdm",
        "pillow",
    ],
    extras_require={
        # flash-attn builds against the installed CUDA torch; apex is not on PyPI (see README).
        "gpu": ["flash-attn"],
        "dev": ["pytest", "pytest-timeout",
                "Flask-WTF"],  # mlflow's basic-auth server app, for the tracking-credentials test
    },
    entry_points={"console_scripts": ["star-scale=star_scale.cli:main"]},
)
