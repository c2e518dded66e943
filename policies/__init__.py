"""Policy YAML files shipped with marcache (installed as package data of ``marcache.policies``)."""
