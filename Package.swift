// swift-tools-version: 6.1
import PackageDescription

// Layers, each a target so that an upward import does not compile:
//   CLinuxHost → VMTemplateOS → VMTemplateQEMU → VMTemplateStore → VMTemplateKit (create, clone,
//   scheduler) → VMTemplateAPI (serve) and VMTemplateDistribution (push, pull) → the vmtemplate
//   CLI and vmtemplate-bench.
let package = Package(
    name: "vmtemplate",
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "VMTemplateKit", targets: ["VMTemplateKit"]),
        .executable(name: "vmtemplate", targets: ["vmtemplate"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        // Foundation on Linux has no SHA-256; template files are digested with swift-crypto.
        .package(url: "https://github.com/apple/swift-crypto.git", from: "3.12.3"),
        // `vmtemplate serve`'s HTTP/JSON API: Hummingbird is a maintained HTTP server on SwiftNIO
        // that listens on a Unix socket (`.unixDomainSocket`) and gives each request its NIO
        // channel, from which the caller's peer credentials are read. No default traits: neither
        // swift-configuration nor full Foundation is needed.
        .package(url: "https://github.com/hummingbird-project/hummingbird.git", from: "2.28.1", traits: []),
        // The API's logger and its byte buffers: already in the graph through Hummingbird, declared
        // because VMTemplateAPI imports them itself (scripts/check-imports holds every target to that).
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.3"),
        // HTTP field names of its own (X-Request-Id): the types Hummingbird's requests and
        // responses are made of, already in the graph through it.
        .package(url: "https://github.com/apple/swift-http-types.git", from: "1.8.0"),
        // The server's graceful shutdown, seen from inside a response (a followed event stream
        // ends when the server stops): Hummingbird runs on it, so it is already in the graph.
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.13.0"),
        // Templates pushed to and pulled from OCI registries (`push`, `pull`): a maintained HTTP
        // client on SwiftNIO, with TLS (swift-nio-ssl), redirects, streaming bodies and
        // timeouts, rather than a hand-written one.
        .package(url: "https://github.com/swift-server/async-http-client.git", from: "1.37.0"),
        // --ca-file: the registry's CA as a TLS trust root (NIOSSL's types, which AsyncHTTPClient
        // takes; already in the graph through it).
        .package(url: "https://github.com/apple/swift-nio-ssl.git", from: "2.37.6"),
    ],
    targets: [
        // The few Linux calls Swift cannot import (variadic prctl(2) and syscall(2)).
        .target(name: "CLinuxHost"),
        // zstd, the system's (Debian's libzstd-dev, installed by scripts/setup): the codec OCI
        // registries and tools know for layers (`+zstd`), fast at level 3, streaming both ways.
        .systemLibrary(name: "CZstd", pkgConfig: "libzstd", providers: [.apt(["libzstd-dev"])]),
        // Host and OS plumbing: errors, sizes, JSON, /proc readers, files and locks, processes.
        .target(name: "VMTemplateOS", dependencies: ["CLinuxHost"]),
        // QEMU: binaries, the command line as a value, QMP, one QEMUInstance per process,
        // and the memory-backend-file rules.
        .target(name: "VMTemplateQEMU", dependencies: ["CLinuxHost", "VMTemplateOS"]),
        // The on-disk store: templates, staging, clone records, settings, admission.
        .target(
            name: "VMTemplateStore",
            dependencies: ["VMTemplateOS", "VMTemplateQEMU", .product(name: "Crypto", package: "swift-crypto")]
        ),
        // What vmtemplate does: create templates, clone them, schedule clones.
        .target(
            name: "VMTemplateKit",
            dependencies: ["CLinuxHost", "VMTemplateOS", "VMTemplateQEMU", "VMTemplateStore"]
        ),
        // The runtime API that `vmtemplate serve` answers on a Unix socket.
        .target(
            name: "VMTemplateAPI",
            dependencies: [
                "CLinuxHost", "VMTemplateOS", "VMTemplateQEMU", "VMTemplateStore", "VMTemplateKit", "VMTemplateDistribution",
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "HTTPTypes", package: "swift-http-types"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ]
        ),
        // Templates between nodes: the OCI artifact a template travels as (chunked, compressed,
        // verified), registries (push, pull) and OCI image layouts (export, import).
        .target(
            name: "VMTemplateDistribution",
            dependencies: [
                "CLinuxHost", "CZstd", "VMTemplateOS", "VMTemplateQEMU", "VMTemplateStore", "VMTemplateKit",
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
            ]
        ),
        .executableTarget(
            name: "vmtemplate",
            dependencies: [
                "VMTemplateOS",
                "VMTemplateQEMU",
                "VMTemplateStore",
                "VMTemplateKit",
                "VMTemplateAPI",
                "VMTemplateDistribution",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                // serve hands the API its logger (ServeLogHandler, --log-format).
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // Benchmarks against real QEMU guests (docs/benchmarks.md); not part of the product.
        .executableTarget(
            name: "vmtemplate-bench",
            dependencies: [
                "VMTemplateOS",
                "VMTemplateQEMU",
                "VMTemplateStore",
                "VMTemplateKit",
                "VMTemplateAPI",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        // Unit tests, one target per layer, each depending only on its layer and those below.
        .testTarget(name: "VMTemplateOSTests", dependencies: ["VMTemplateOS"]),
        .testTarget(name: "VMTemplateQEMUTests", dependencies: ["VMTemplateOS", "VMTemplateQEMU"]),
        .testTarget(name: "VMTemplateStoreTests", dependencies: ["VMTemplateOS", "VMTemplateQEMU", "VMTemplateStore"]),
        .testTarget(name: "VMTemplateKitTests", dependencies: ["VMTemplateOS", "VMTemplateQEMU", "VMTemplateStore", "VMTemplateKit"]),
        // Real QEMU, real guests, the CLI and the server: everything a user would run.
        .testTarget(
            name: "VMTemplateIntegrationTests",
            dependencies: ["VMTemplateOS", "VMTemplateQEMU", "VMTemplateStore", "VMTemplateKit", "VMTemplateAPI", "VMTemplateDistribution"]
        ),
    ],
    swiftLanguageModes: [.v6]
)
