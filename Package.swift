// swift-tools-version: 6.0
import PackageDescription

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
    ],
    targets: [
        // The few Linux calls Swift cannot import (variadic prctl(2)).
        .target(name: "CLinuxHost"),
        .target(
            name: "VMTemplateKit",
            dependencies: ["CLinuxHost", .product(name: "Crypto", package: "swift-crypto")]
        ),
        .executableTarget(
            name: "vmtemplate",
            dependencies: [
                "VMTemplateKit",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        // Benchmarks against real QEMU guests (docs/benchmarks.md); not part of the product.
        .executableTarget(
            name: "vmtemplate-bench",
            dependencies: [
                "VMTemplateKit",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .testTarget(
            name: "VMTemplateKitTests",
            dependencies: ["VMTemplateKit"]
        ),
    ],
    swiftLanguageModes: [.v6]
)
