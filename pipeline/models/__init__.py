"""Models: our ResNet family (one table of depths) and a factory that also serves timm models.

Import from the module that owns each thing; this package imports none of them, so that a verb
that only needs the model names (pipeline/models/names.py: runs, status) does not load torch:
- names.py: our model names and depths, `is_timm_name` (no torch);
- factory.py: `create_model`, `model_input_config`, `small_input_warning`;
- resnet.py: the ResNet blocks and the ARCHS table; weights.py: loading pretrained weights;
- finetune.py: fine-tuning's parameter groups and freezing (training alone imports it).
"""
