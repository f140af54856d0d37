"""After the repository stage: putting a built repository where servers read it (S3-compatible storage)."""
