"""The Quark Hugging Face checkpoint layout: writer, model skeletons and reader."""
