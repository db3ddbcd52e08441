"""The policy: model, YAML loading and validation, compilation to maps."""
