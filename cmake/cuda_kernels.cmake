# nvcc compile checks of the torch-free CUDA kernels (csrc/cuda/*.cu) for Hopper (sm_90a: wgmma)
# and Ampere (sm_80), as one object library. Included by CMakeLists.txt when present; skipped
# quietly where no CUDA compiler is found. The Python extension itself is built by setup.py.
#   cmake -S . -B build/cmake && cmake --build build/cmake --target ernie_cuda_kernels -j2
# CUTLASS/CuTe headers: -DERNIE_CUTLASS_INCLUDE=<dir>, else the `nvidia-cutlass` wheel's copy
# (python -c "import cutlass_library"), else build/cutlass/ as unpacked by tests/test_cuda_build.py.
include(CheckLanguage)
check_language(CUDA)
if(NOT CMAKE_CUDA_COMPILER)
  message(STATUS "ernie_core: no CUDA compiler, skipping the CUDA kernel compile checks")
  return()
endif()
enable_language(CUDA)

set(ERNIE_CUTLASS_INCLUDE "" CACHE PATH "CUTLASS include dir (holds cute/ and cutlass/)")
if(NOT ERNIE_CUTLASS_INCLUDE)
  find_package(Python3 COMPONENTS Interpreter QUIET)
  if(Python3_FOUND)
    execute_process(
      COMMAND ${Python3_EXECUTABLE} -c "import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), 'source', 'include'))"
      OUTPUT_VARIABLE _cutlass_inc OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  endif()
  if(_cutlass_inc AND EXISTS "${_cutlass_inc}/cute")
    set(ERNIE_CUTLASS_INCLUDE "${_cutlass_inc}")
  elseif(EXISTS "${CMAKE_CURRENT_SOURCE_DIR}/build/cutlass/cutlass_library/source/include/cute")
    set(ERNIE_CUTLASS_INCLUDE "${CMAKE_CURRENT_SOURCE_DIR}/build/cutlass/cutlass_library/source/include")
  endif()
endif()
if(NOT ERNIE_CUTLASS_INCLUDE)
  message(WARNING "ernie_core: CUTLASS headers not found (pip install nvidia-cutlass, or -DERNIE_CUTLASS_INCLUDE=); "
                  "skipping the CUDA kernel compile checks")
  return()
endif()

file(GLOB ERNIE_CUDA_SOURCES CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/csrc/cuda/*.cu)
add_library(ernie_cuda_kernels OBJECT ${ERNIE_CUDA_SOURCES})
# The -gencode form: wgmma needs the arch-specific sm_90a target (HOPPER.md; `-arch=sm_90a` also
# ran a plain sm_90 pass that rejects wgmma on some nvcc versions).
set_target_properties(ernie_cuda_kernels PROPERTIES CUDA_ARCHITECTURES OFF CUDA_STANDARD 17 CUDA_STANDARD_REQUIRED ON
                                                    POSITION_INDEPENDENT_CODE ON)
target_include_directories(ernie_cuda_kernels PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/csrc ${ERNIE_CUTLASS_INCLUDE})
target_compile_options(ernie_cuda_kernels PRIVATE
  $<$<COMPILE_LANGUAGE:CUDA>:-O3 --use_fast_math --expt-relaxed-constexpr
  -gencode=arch=compute_90a,code=sm_90a -gencode=arch=compute_80,code=sm_80>)

# Host-side tests of the kernels' index math (no GPU needed to run them): the FlashMask plan and the
# Hopper kernels' CuTe layouts / MMA partitions. tests/test_cuda_build.py runs the same programs.
foreach(_t host_mask_test host_layout_test)
  add_executable(ernie_cuda_${_t} csrc/cuda/test/${_t}.cu)
  set_target_properties(ernie_cuda_${_t} PROPERTIES CUDA_ARCHITECTURES OFF CUDA_STANDARD 17 CUDA_STANDARD_REQUIRED ON)
  target_include_directories(ernie_cuda_${_t} PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/csrc ${ERNIE_CUTLASS_INCLUDE})
  target_compile_options(ernie_cuda_${_t} PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr>)
endforeach()
add_test(NAME cuda_host_layouts COMMAND ernie_cuda_host_layout_test)
# The mask plan program needs an index file; ctest runs it on a small causal-document mask.
file(WRITE ${CMAKE_CURRENT_BINARY_DIR}/host_mask_documents.txt "1 1 300 1 1\n")
foreach(_j RANGE 0 299)
  if(_j LESS 100)
    set(_v 100)
  elseif(_j LESS 270)
    set(_v 270)
  else()
    set(_v ${_j})
  endif()
  file(APPEND ${CMAKE_CURRENT_BINARY_DIR}/host_mask_documents.txt "${_v} ")
endforeach()
add_test(NAME cuda_host_mask_plan COMMAND ernie_cuda_host_mask_test ${CMAKE_CURRENT_BINARY_DIR}/host_mask_documents.txt)
