# cmake -DEMBED_SOURCE=... -DEMBED_SYMBOL=... -DEMBED_OUTPUT=... -P embed.cmake
# Turns a Lua file into a C++ constant compiled into the module.
file(READ "${EMBED_SOURCE}" EMBED_TEXT)
configure_file("${CMAKE_CURRENT_LIST_DIR}/embed.cpp.in" "${EMBED_OUTPUT}" @ONLY)
