"""images: which files are photos (`folders`, torch-free), which of them are held out (`split`), crops and batches
(`images`: uint8 crops and view plans per (epoch, index), normalized on the device), and sources beyond a folder
(`sources`: Hugging Face datasets, WebDataset shards)."""
