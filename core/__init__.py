"""mmcurate core: pure algorithms and I/O for multimodal data curation. Never imports flytekit."""
