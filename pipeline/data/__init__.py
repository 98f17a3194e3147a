"""Data: DICOMs and image folders -> labels, splits, TFRecord shards; the tf.data pipeline that reads them."""
