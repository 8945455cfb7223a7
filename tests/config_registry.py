"""Which YAML in config/ is checked against which schema (tests/test_configs.py reads this).

Add a line per config file: path relative to the repo root -> "module:SchemaClass". Accelerate configs
(config/accelerate_config_*.yaml) are found by name and checked with accelerate's own loader.
"""

SCHEMAS: dict[str, str] = {
    "config/lora_train.yaml": "ai.lora.train_lora_sdxl:Config",
    "config/demo/lora_train.yaml": "ai.lora.train_lora_sdxl:Config",
    "config/lora_infer.yaml": "ai.lora.infer_lora_sdxl:LoraInferConfig",
    "config/demo/lora_infer.yaml": "ai.lora.infer_lora_sdxl:LoraInferConfig",
    "config/controlnet_train.yaml": "ai.controlnet.train_controlnet_sdxl:Config",
    "config/demo/controlnet_train.yaml": "ai.controlnet.train_controlnet_sdxl:Config",
}
SCHEMAS["config/controlnet_infer.yaml"] = "ai.controlnet.infer_controlnet_sdxl:ControlNetInferConfig"
SCHEMAS["config/demo/controlnet_infer.yaml"] = "ai.controlnet.infer_controlnet_sdxl:ControlNetInferConfig"
SCHEMAS["config/demo/annotation.yaml"] = "annotation.settings:AnnotationConfig"
SCHEMAS["config/fidelity.yaml"] = "annotation.fidelity_config:FidelityConfig"
SCHEMAS["config/bdd_to_yolo.yaml"] = "convert.bdd_to_yolo:ExportConfig"
SCHEMAS["config/demo/detector.yaml"] = "annotation.train_demo_detector:DemoDetectorConfig"
SCHEMAS["config/gain.yaml"] = "annotation.evaluate_gain:GainConfig"
SCHEMAS["config/diagnose.yaml"] = "annotation.diagnose:DiagnoseConfig"
SCHEMAS["config/loop.yaml"] = "annotation.loop.config:LoopConfig"
SCHEMAS["config/demo/loop.yaml"] = "annotation.loop.config:LoopConfig"
