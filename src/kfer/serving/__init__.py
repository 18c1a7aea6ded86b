"""Using a trained model the way training cropped: the Keras objects a saved model needs, the photo pyfunc and
publishing it, the registry, predict, videos and Grad-CAM."""
