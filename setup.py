from setuptools import find_packages, setup

setup(
    name="dato-sd",
    version="0.1.0",
    description="DaTo (dynamics-aware token pruning + timestep-aware caching) on a CompVis latent-diffusion codebase",
    package_dir={"": "sd1"},
    packages=find_packages("sd1"),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.1",
        "numpy",
        "einops",
        "omegaconf",
        "pyyaml",
        "safetensors",
        "transformers>=4.30",
        "open-clip-torch>=2.20",
        "tqdm",
        "pillow",
        "tomesd",
        "matplotlib",
    ],
    extras_require={
        "test": ["pytest", "hypothesis", "scipy", "pytorch-fid", "pymoo>=0.6", "dask[distributed]"],
        "search": ["pymoo>=0.6", "dask[distributed]"],
        "metrics": ["pytorch-fid", "scipy"],
        "imagereward": ["image-reward"],
        # datosd.apply_patch on diffusers pipelines; tested with diffusers 0.42.x (README "diffusers pipelines")
        "diffusers": ["diffusers>=0.42,<0.43", "DeepCache>=0.1.1"],
    },
)
