// onnxruntime's C++ API as this library uses it: the API table is handed over by RegisterCustomOps (no link to
// onnxruntime), so every file includes the header through here with manual initialisation.
#pragma once

#ifndef ORT_API_MANUAL_INIT
#define ORT_API_MANUAL_INIT
#endif
#include "onnxruntime_cxx_api.h"
