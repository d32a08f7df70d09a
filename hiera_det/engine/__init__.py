"""Training-loop parts that Detectron2's engine lacks: `hooks`, `evaluation`, `launch`,
`visualize`, `schedule`."""
