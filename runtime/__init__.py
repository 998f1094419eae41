"""The daemon process (`miradord`): config, Ray bootstrap, the ZeroMQ server, orchestration."""
