"""glm4rt inside other engines: ``glm4rt.integrations.ray`` (Ray Data batch jobs, Ray Serve)."""
