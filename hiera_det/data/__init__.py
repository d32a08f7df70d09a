"""Everything data: `datasets` (registration of COCO-format data named in a config), `images`
(reading images of any mode, image folders, the policy for an image that cannot be used),
`validation` (COCO json checks before training), `mapper` (the training-time
`RobustDatasetMapper`), `sampling` (the resumable sampler and loader, RNG helpers), `synthetic`
(the built-in shapes dataset) and `lvis`. MAE's image-folder dataset lives with MAE
(`hiera_det.mae.data`) and uses these. Submodules are not imported here: ``python -m
hiera_det.data.synthetic`` must not find its own module already imported."""
