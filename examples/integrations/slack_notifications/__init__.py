"""An example result handler: a summary of each finished batch posted to a Slack incoming webhook."""
