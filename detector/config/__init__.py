"""Configuration: the config library (`cfgnode`: CfgNode, YAML loading with `_BASE_`, merging, type and
choice checks, ConfigError) and the detector's keys (`defaults`: get_cfg, load_cfg, DETECTOR_CHOICES)."""
from detector.config.cfgnode import (BASE_KEY, CfgNode, ConfigError, check_choices, load_config,
                                     load_yaml_with_base, lookup)
from detector.config.defaults import DETECTOR_CHOICES, get_cfg, load_cfg, validate_detector_cfg

__all__ = ["BASE_KEY", "CfgNode", "ConfigError", "DETECTOR_CHOICES", "check_choices", "get_cfg", "load_cfg",
           "load_config", "load_yaml_with_base", "lookup", "validate_detector_cfg"]
