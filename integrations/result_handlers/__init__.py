"""Result handlers: deliver a finished batch's files somewhere (S3, GCS, your own), one asset per handler."""
