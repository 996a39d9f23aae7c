"""The built-in CPU demo (`mugv demo`): synthetic moving shapes, a PCA autoencoder standing in
for the video VAE, and the end-to-end pipeline prep -> curriculum -> convert -> sample."""
