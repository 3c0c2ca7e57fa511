"""The Dagster definitions: the code location's Definitions, sensors, schedules and the enabled integrations."""
