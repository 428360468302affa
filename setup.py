from setuptools import find_packages, setup

setup(
    name="torch-fadjoint",
    version="0.1.0",
    description="Train feed-forward PyTorch networks without autograd: the F-adjoint and its sibling rules",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["torch_fadjoint", "torch_fadjoint.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.1", "torchvision", "numpy", "tqdm"],
    extras_require={"dev": ["pytest", "matplotlib"], "plots": ["matplotlib"]},
    license="MIT",
)
