"""Models as stored artifacts: MLflow logging, the served pyfunc, loading a version, its hash and tags."""
