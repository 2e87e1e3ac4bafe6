"""The workflow layer: workflow YAML, the stage registry, the runner (spec, plan, run, report),
`mmvq submit` and the `mmvq` command line. It drives pipeline/; pipeline/ never imports it."""
