"""ROS-free core: engine, eviction presses, time estimator, budget solver, length predictor."""
