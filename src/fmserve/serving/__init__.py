"""The serving domain: endpoints, served entities, routing, and the query logic."""
