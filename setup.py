from setuptools import find_packages, setup

# What torch_fadjoint imports: torch only (torch_fadjoint.data imports torchvision when a data set is read).
# torchvision is an extra so that `pip install .` into an existing torch never changes that torch (an unpinned
# torchvision pulls the torch it was built for). Python >= 3.11: the benchmarks and tests read TOML with tomllib.
BENCH = ["torchvision", "matplotlib", "tqdm"]  # benchmarks/: data sets, plots, progress bars

setup(
    name="torch-fadjoint",
    version="0.1.0",
    description="Train feed-forward PyTorch networks without autograd: the F-adjoint and its sibling rules",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["torch_fadjoint", "torch_fadjoint.*"]),
    python_requires=">=3.11",
    install_requires=["torch>=2.1"],
    extras_require={"data": ["torchvision"], "bench": BENCH, "dev": ["pytest", *BENCH]},
    license="MIT",
)
