__global__ void dk_placeholder() {}
