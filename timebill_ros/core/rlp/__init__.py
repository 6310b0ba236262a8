"""
Response length predictor (RLP): the model that predicts N̂, and the data it learns from.

TimeBill's WCET scales with the predicted response length, so this package holds everything
about that prediction, split by concern: the label space (``buckets``), the feature extractors
(``backbones``), the inference-time predictor and its checkpoints (``predictor``), the training
loops (``training``) and their entry point (``train``), and the length dataset: prompts
(``prompts``), labelling with the target model (``greedy_labeler``, ``labelling``) and the
label file (``label_io``).
``timebill_ros.core.length_predictor`` and ``timebill_ros.core.length_data`` re-export the public
names. Kept import-light: torch and transformers load only when a model is built or trained.
"""
