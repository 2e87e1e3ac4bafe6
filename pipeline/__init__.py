"""mmvq's pipeline: the stages, their Ray glue, MLflow tracking and the ``mmvq`` command."""
